"""objdl: move large objects from one process to many over a ZeroMQ broker."""
