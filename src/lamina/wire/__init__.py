"""The lamina wire protocol: framing, messages, handshake and connections."""
