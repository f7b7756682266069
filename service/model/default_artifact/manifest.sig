{
  "algorithm": "Ed25519",
  "key_id": "4164948660f86b3d",
  "signature": "PrAkKJLXnenXVULFphu2rSEUU3325nA6gzGaLYVCXkdFHRYGlxnAt33q9A9u86U1zvjMmjQEP6IwxYxxZpULBA=="
}
