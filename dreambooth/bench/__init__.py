"""`dreambooth bench`: step time, memory and sampling throughput of the memory profiles, as JSON and a table."""
