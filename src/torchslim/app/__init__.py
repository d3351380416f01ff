"""The application: CLI, recipes, the runner, the demo, inspect and the report.

It calls techniques through the stage registry; nothing in core or a technique imports it."""
