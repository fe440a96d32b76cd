"""The test service for the W3C Trace Context test suite (the suite is not kept here)."""
