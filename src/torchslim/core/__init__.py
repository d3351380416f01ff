"""Core: task, training, measurement, the stage registry and the config contract.

Techniques and the application import core; core imports neither."""
