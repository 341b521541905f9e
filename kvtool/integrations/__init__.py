"""kvtool inside other systems (each integration imports its host only when used)."""
