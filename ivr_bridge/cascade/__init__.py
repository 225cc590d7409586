"""A voice session of the bridge's own: speech-to-text, a dialogue step, text-to-speech."""
