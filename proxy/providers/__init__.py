"""What a provider is: access tokens, callback authentication (more moves here later)."""
