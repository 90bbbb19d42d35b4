"""The productivity profile's agents: vision, summarizer, writer, translator."""
