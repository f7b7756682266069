{
  "algorithm": "Ed25519",
  "key_id": "cc7bdf0a519a22b6",
  "signature": "A+4OY7KAS7GkPqnNP9o6hovxpoBsyWPOLEGdAuTYVP+MTbeO4kAkct5zCiaYkFYfs/FVlAsWLoWItl+IXf8pDw=="
}
