"""Consent-gated recording: the media side (depacketizers, container writers, the writer
thread) and the control side (:mod:`relay.recording.service`). Nothing here decodes media."""
