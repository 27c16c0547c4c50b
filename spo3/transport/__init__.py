"""Transport: what every process shares - message contracts, Redis names and connections, process
helpers, the work queue, the groups stream and metrics. Imports nothing else of the project."""
