"""Privacy room: pseudonyms, the server keyring, and field sealing (HPKE data key + AES-GCM).

Shared by the server (which opens) and the client SDK (which seals); imports no model code.
"""
