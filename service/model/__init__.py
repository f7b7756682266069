"""The model room: signed artifact format (schema, manifest) and, server-side, scoring."""
