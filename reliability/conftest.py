"""``make reliability`` runs every test here; ``slow`` marks the longest (the Docker recipe)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes long (make reliability runs it)")
