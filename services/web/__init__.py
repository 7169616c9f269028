"""The web page: plates, live plate maps, wells, reports and uploads, read
through the mesh's gRPC contracts (never the database)."""
