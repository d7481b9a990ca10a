"""The objdl broker: a ZeroMQ ROUTER that routes messages between cells by name."""
