"""Local Debian machines and the embedded EC2 behind --sandbox."""
