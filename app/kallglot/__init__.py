"""Everything that knows Kallglot: the REST client and the stream-protocol assumptions."""
