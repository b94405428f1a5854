# Exact readiness for unicorn-shim. Add to the Unicorn config:
#
#   require "unicorn_shim"     # or: require "/usr/share/unicorn-shim/ruby/unicorn_shim"
#
# The master says hello when the config loads; each worker reports once it is
# ready to accept (after after_worker_ready, which keeps working as before).
# Outside the shim (no UNICORN_SHIM_CHANNEL) it does nothing.
require_relative "unicorn_shim_channel"

module UnicornShim
  def self.say(text)
    UnicornShimChannel.say(text)   # nothing outside the shim; the heuristic stands in if it is lost
  end

  # Wraps whatever after_worker_ready the config sets (the Configurator sets
  # it always, to its default when the config says nothing).
  module ReadyHook
    def after_worker_ready=(hook)
      super(lambda do |server, worker|
        hook.call(server, worker)
        UnicornShim.say("ready worker=#{worker.nr} workers=#{server.worker_processes}")
      end)
    end
  end
end

if defined?(Unicorn::HttpServer)
  Unicorn::HttpServer.prepend(UnicornShim::ReadyHook)
  UnicornShim.say("hello")
end
