"""Gates as broker clients: their MQTT accounts and what each may publish and read."""
