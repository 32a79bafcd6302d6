"""Call legs and the Kallglot session lifecycle, shared by every carrier adapter."""
