"""End-to-end tests: taskstream processes started by the CLI, plain clients of each broker, workers killed
mid-run and servers restarted."""
