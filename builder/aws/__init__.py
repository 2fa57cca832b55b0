"""Everything that talks to AWS: the EC2 client, the learned waits, typed resource operations."""
