"""Text messages to drivers' phones through a real SMS service (Alibaba Cloud SMS)."""
