"""The storage server role: page store, sync masks, epochs and the TCP server."""
