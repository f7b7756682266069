"""One thin servicer per service: validate -> decide -> audit -> reply."""
