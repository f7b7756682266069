{
  "algorithm": "Ed25519",
  "key_id": "3c0ca2a8738ece41",
  "signature": "pu4SzJMXja04ehNBqLZ6PaLf1mV061lqLFvGhgB3DnqUj475zd+0mEy10k6veroliVaQnWSmGek6yAB9EhkdBA=="
}
