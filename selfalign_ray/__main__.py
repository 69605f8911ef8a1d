from selfalign_ray.cli import main

if __name__ == "__main__":  # spawn-safe: vLLM engine processes re-import __main__
    main()
