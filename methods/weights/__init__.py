"""Model weights shipped with the lab (package data)."""
