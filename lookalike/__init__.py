"""The application: the CLI, the demo pipeline, the embedded broker, worker processes,
benches and experiment runners. It sits on top of every other package (engine, models,
consumers) and nothing below imports it."""
