"""Data modules and loaders for the three stages."""
