"""Runtime glue shared by the lab's processes: the MQTT client factory, the thermometer, the native runner."""
