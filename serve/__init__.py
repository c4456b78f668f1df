"""The dawn Ray Serve application (app.py) and its config (config.yaml)."""
