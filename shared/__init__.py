"""What the daemon and its clients both speak: protocol, errors, file layout, transports."""
