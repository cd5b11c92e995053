def handle(input: bytes) -> bytes:
    name = input.decode() or "world"
    return f"hello {name} from python".encode()
