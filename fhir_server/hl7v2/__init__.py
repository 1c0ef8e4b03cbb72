"""The HL7 v2 adapter: ER7 messages read (``er7``), acknowledged (``ack``) and framed over MLLP (``mllp``)."""
