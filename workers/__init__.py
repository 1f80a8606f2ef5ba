"""flowbus.workers: processes, the command line and the demo."""
