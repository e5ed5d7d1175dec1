"""CLI commands. Each module defines ``register(app: typer.Typer) -> None``; cli.py finds them all."""
