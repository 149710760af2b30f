"""The embedded default: synthetic world data and a tiny model, built offline."""
