"""Test helpers shared by the integration and end-to-end suites (real processes, no mocks)."""
