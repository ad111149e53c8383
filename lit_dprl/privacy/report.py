"""The privacy report written next to every trained model."""

REPORT_NAME = "privacy.json"
