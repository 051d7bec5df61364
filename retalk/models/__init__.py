"""The networks of VideoReTalking, one family per module, each with the loader for its official file."""
