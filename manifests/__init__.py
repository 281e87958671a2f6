"""Dataset presets and named config presets shipped with pcd (package data)."""
