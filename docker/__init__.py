"""Dockerfile templates (installed as edgekit.docker); `edgekit docker build` renders a build context from them."""
