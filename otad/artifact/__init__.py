"""The Mender Artifact v3 format: reading, verifying, writing and signing artifacts."""
