"""Development and test tooling: the demo, the Kallglot emulator, carrier simulators and fakes, the chaos
run and the load benchmark. Never imported by production code (an import-linter contract checks it)."""
