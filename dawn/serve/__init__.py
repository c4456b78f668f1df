"""The Ray Serve application (`dawn.serve.app:build_app`): stage deployments behind a FastAPI ingress."""
