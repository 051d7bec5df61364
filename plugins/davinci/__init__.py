"""The DaVinci Resolve script as installed data: `retalk resolve install` copies it into Resolve's Scripts folder."""
