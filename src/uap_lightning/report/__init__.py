"""Pictures and files a run writes."""
