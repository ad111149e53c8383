"""The name of the privacy report written next to every exported model."""

REPORT_NAME = "privacy.json"
