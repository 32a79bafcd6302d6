"""Operations: health and readiness, the landing page, graceful draining."""
