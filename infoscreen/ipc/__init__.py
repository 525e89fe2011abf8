"""Messages and sockets between the processes of the tree (ZeroMQ over ipc://)."""
