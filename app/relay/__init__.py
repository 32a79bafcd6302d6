"""The vendor-free media relay: carrier media socket ⇄ Kallglot stream socket."""
